//go:build !linux

package faultlab

import "fmt"

const netnsSupported = false

func (n *Netns) enterThread() error {
	return fmt.Errorf("%w: only on Linux", ErrNoNetns)
}

func (n *Netns) inside(func() error) error { return n.enterThread() }
