module github.com/shmserve/shmserve/examples/go

go 1.26.0

require github.com/shmserve/shmserve/goclient v0.0.0

require golang.org/x/sys v0.50.0 // indirect

replace github.com/shmserve/shmserve/goclient => ../../goclient
