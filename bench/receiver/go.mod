module benchreceiver

go 1.22
