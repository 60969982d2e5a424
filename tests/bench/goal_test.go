package main

import "testing"

// A goal is evaluated in code: a miss is a miss, "info" is not a goal, and a
// goal without a number cannot pass silently.
func TestMeetsGoal(t *testing.T) {
	for _, c := range []struct {
		value         float64
		goal          string
		ok, evaluated bool
	}{
		{0.95, ">= 0.90", true, true},
		{0.89, ">= 0.90", false, true},
		{250, "<= 250", true, true},
		{251, "<= 250", false, true},
		{4.5, ">= 4", true, true},
		{0.1, "info: baseline", false, false},
		{12, "info", false, false},
	} {
		ok, evaluated := meetsGoal(c.value, c.goal)
		if ok != c.ok || evaluated != c.evaluated {
			t.Errorf("meetsGoal(%v, %q) = %v, %v; want %v, %v", c.value, c.goal, ok, evaluated, c.ok, c.evaluated)
		}
	}
	defer func() {
		if recover() == nil {
			t.Error("a goal without a number did not panic")
		}
	}()
	meetsGoal(1, ">= much")
}
