# Sourced by the test and image-check commands: make a command available from its
# Debian package, installing it when it is missing and this user may (root, or
# sudo without a password); otherwise say in one line how to install it.
#
#   need_debian_package COMMAND PACKAGE   returns 0 when COMMAND is on PATH afterwards

_apt_updated=0

need_debian_package() {
    local command=$1 package=$2 sudo=()
    if command -v "$command" >/dev/null 2>&1; then
        return 0
    fi
    if [[ $(id -u) != 0 ]]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            echo "\`$command\` is missing: install it with \`sudo apt-get install -y $package\` (or run this as root)" >&2
            return 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "\`$command\` is missing and there is no apt-get here: install the $package package" >&2
        return 1
    fi
    echo "== installing $package (Debian package, for \`$command\`)"
    if [[ $_apt_updated == 0 ]]; then
        "${sudo[@]}" apt-get update -qq >/dev/null
        _apt_updated=1
    fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "$package" >/dev/null
    command -v "$command" >/dev/null 2>&1
}
