package main

import (
	"os"
	"strconv"
	"strings"
	"syscall"
)

// userHZ is the unit of the CPU times in /proc/PID/stat: fixed at 100 by
// the Linux ABI, whatever the kernel's internal tick.
const userHZ = 100

// selfCPU is the CPU time (user + system) this process has used, in seconds.
func selfCPU() float64 {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

// groupCPU is the CPU time of every live process in process group pgid, in
// seconds (0 for pgid 0). It reads /proc, so it is only for cell boundaries.
func groupCPU(pgid int) float64 {
	if pgid == 0 {
		return 0
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	ticks := 0
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		stat, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue // exited meanwhile
		}
		// The command name may hold spaces and parentheses: the fields that
		// matter come after its last ')'. Then: state ppid pgrp ... utime
		// (field 14) stime (field 15).
		fields := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
		if len(fields) < 13 || fields[2] != strconv.Itoa(pgid) {
			continue
		}
		utime, _ := strconv.Atoi(fields[11])
		stime, _ := strconv.Atoi(fields[12])
		ticks += utime + stime
	}
	return float64(ticks) / userHZ
}
