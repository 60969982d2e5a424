package l2_test

import "syscall"

const interruptSignal = syscall.SIGINT
