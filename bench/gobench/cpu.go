package main

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
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

// pinAll confines every thread of this process to cpu, and returns what
// puts them back on the CPUs the process had. A thread started meanwhile
// inherits the set of the thread that starts it, so the whole process stays
// on cpu until then.
func pinAll(cpu int) (restore func() error, err error) {
	var before, one unix.CPUSet
	if err := unix.SchedGetaffinity(0, &before); err != nil {
		return nil, fmt.Errorf("reading this process's CPUs: %w", err)
	}
	one.Set(cpu)
	if err := setAll(&one); err != nil {
		setAll(&before)
		return nil, fmt.Errorf("pinning to CPU %d: %w", cpu, err)
	}
	return func() error { return setAll(&before) }, nil
}

func setAll(set *unix.CPUSet) error {
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return err
	}
	for _, task := range tasks {
		tid, err := strconv.Atoi(task.Name())
		if err != nil {
			continue
		}
		if err := unix.SchedSetaffinity(tid, set); err != nil && !errors.Is(err, unix.ESRCH) {
			return err // ESRCH: the thread exited meanwhile
		}
	}
	return nil
}
