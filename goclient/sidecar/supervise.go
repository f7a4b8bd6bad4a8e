// Supervision: a server that dies is restarted with backoff, within a budget per minute.

package sidecar

import (
	"context"
	"fmt"
	"time"
)

func (s *Sidecar) becameReady(c *child) {
	s.mu.Lock()
	s.ready = c.ready
	s.mu.Unlock()
	s.logger.Info("sidecar: server ready", "pid", c.ready.PID, "transports", c.ready.Transports)
	if s.cfg.OnReady != nil {
		s.cfg.OnReady(c.ready)
	}
}

// supervise waits for the child to exit and restarts it, until Stop or
// until the restart budget is spent.
func (s *Sidecar) supervise(c *child) {
	defer close(s.done)
	var recent []time.Time // restart attempts in the last minute
	failures := 0          // restarts in a row that did not last stableAfter
	for {
		select {
		case <-s.stopCh:
			s.stopErr = c.terminate(s.cfg.StopGrace, s.stopCtx.Done())
			c.drained() // so that the caller has all of its output once Stop returns
			return
		case <-c.exited:
		}
		if time.Since(c.readyAt) >= stableAfter {
			failures = 0
		}
		s.logger.Warn("sidecar: server exited", "pid", c.pid, "status", c.status(),
			"ran", time.Since(c.readyAt).Round(time.Millisecond), "stderr_tail", c.stderr.last())
		for {
			now := time.Now()
			for len(recent) > 0 && now.Sub(recent[0]) >= time.Minute {
				recent = recent[1:]
			}
			if s.cfg.MaxRestartsPerMinute < 0 || len(recent) >= s.cfg.MaxRestartsPerMinute {
				s.giveUp(c, len(recent))
				return
			}
			delay := s.backoff(failures)
			failures++
			select {
			case <-s.stopCh:
				return
			case <-time.After(delay):
			}
			recent = append(recent, time.Now())
			next, err := s.restart()
			if err == nil {
				c = next
				break
			}
			select {
			case <-s.stopCh:
				return
			default:
			}
			s.logger.Warn("sidecar: restart failed", "err", err)
			c = &child{exitErr: err, stderr: &tail{}}
		}
		s.mu.Lock()
		s.restarts++
		s.mu.Unlock()
		s.becameReady(c)
	}
}

// backoff is MinBackoff doubled once per failure, at most MaxBackoff.
func (s *Sidecar) backoff(failures int) time.Duration {
	delay := s.cfg.MinBackoff
	for range failures {
		if delay >= s.cfg.MaxBackoff/2 {
			return s.cfg.MaxBackoff
		}
		delay *= 2
	}
	return delay
}

// restart spawns a new child, giving up when ReadyTimeout passes or Stop
// is called.
func (s *Sidecar) restart() (*child, error) {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.ReadyTimeout)
	defer cancel()
	go func() {
		select {
		case <-s.stopCh:
			cancel()
		case <-ctx.Done():
		}
	}()
	return s.spawn(ctx)
}

func (s *Sidecar) giveUp(last *child, attempts int) {
	var err error
	if s.cfg.MaxRestartsPerMinute < 0 {
		err = fmt.Errorf("%w (restarts disabled): %s", ErrGaveUp, last.status())
	} else {
		err = fmt.Errorf("%w: %d restarts in the last minute, the last one: %s", ErrGaveUp, attempts, last.status())
	}
	s.mu.Lock()
	s.err = err
	s.mu.Unlock()
	s.logger.Error("sidecar: giving up", "err", err)
}
