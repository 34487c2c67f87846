module benchloadgen

go 1.22
