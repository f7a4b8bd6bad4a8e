module github.com/shmserve/shmserve/bench/gobench

go 1.26.0

require (
	github.com/HdrHistogram/hdrhistogram-go v1.4.0
	github.com/go-zeromq/zmq4 v0.17.0
	github.com/shmserve/shmserve/goclient v0.0.0
	go.nanomsg.org/mangos/v3 v3.4.2
	golang.org/x/sys v0.50.0
	google.golang.org/grpc v1.85.0
)

require (
	github.com/Microsoft/go-winio v0.5.2 // indirect
	github.com/go-zeromq/goczmq/v4 v4.2.2 // indirect
	golang.org/x/net v0.60.0 // indirect
	golang.org/x/sync v0.23.0 // indirect
	golang.org/x/text v0.42.0 // indirect
	google.golang.org/genproto/googleapis/rpc v0.0.0-20260817212433-ac3dfec99bb1 // indirect
	google.golang.org/protobuf v1.36.12 // indirect
)

replace github.com/shmserve/shmserve/goclient => ../../goclient
