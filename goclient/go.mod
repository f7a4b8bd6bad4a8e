module github.com/shmserve/shmserve/goclient

go 1.26.0

require (
	github.com/HdrHistogram/hdrhistogram-go v1.4.0
	golang.org/x/image v0.48.0
	golang.org/x/sys v0.50.0
)
