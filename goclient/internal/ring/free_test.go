package ring

import "testing"

func TestFreeSlotsHandsBackTheLastReleasedFirst(t *testing.T) {
	slots := make([]slot, 4)
	f := newFreeSlots(len(slots))
	for i := range slots {
		slots[i].index = i
		f.put(&slots[i])
	}
	take := func() int {
		t.Helper()
		select {
		case <-f.tokens:
		default:
			t.Fatal("no token for a free slot")
		}
		return f.take().index
	}
	if got := take(); got != 3 {
		t.Fatalf("first take: slot %d, want the last put (3)", got)
	}
	f.put(&slots[3])
	if got := take(); got != 3 {
		t.Fatalf("after a release: slot %d, want it again (3)", got)
	}
	// A slot another process holds goes under the rest: the next takes try them first.
	f.putUnder(&slots[3])
	for _, want := range []int{2, 1, 0, 3} {
		if got := take(); got != want {
			t.Fatalf("took slot %d, want %d", got, want)
		}
	}
	select {
	case <-f.tokens:
		t.Fatal("a token with no free slot")
	default:
	}
}

func TestFreeSlotsAllocateNothing(t *testing.T) {
	slots := make([]slot, 2)
	f := newFreeSlots(len(slots))
	for i := range slots {
		f.put(&slots[i])
	}
	if n := testing.AllocsPerRun(1000, func() {
		<-f.tokens
		s := f.take()
		f.putUnder(s)
		<-f.tokens
		f.put(f.take())
	}); n != 0 {
		t.Fatalf("%v allocations per take and put", n)
	}
}
