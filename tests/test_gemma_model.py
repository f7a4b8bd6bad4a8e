"""GemmaModel's batching and cancellation (shmserve/models/gemma.py) against a scripted engine,
so the rules are checked exactly and without JAX: which requests share a generation, and that
a generation nobody waits for any more stops at once."""
import threading

from shmserve import ErrorCode
from shmserve.models.gemma import GemmaModel


class ScriptedEngine:
    """Emits one piece per prompt per step, as the real engine does when streaming."""
    variant, cache_length, max_new_tokens_limit = "scripted", 128, 100

    def __init__(self):
        self.steps_run = []

    def check_prompt(self, prompt, max_new_tokens):
        pass

    def generate(self, prompts, max_new_tokens, on_piece=None):
        steps = 0
        try:
            for _ in range(max_new_tokens):
                steps += 1
                if on_piece is not None:
                    for index in range(len(prompts)):
                        on_piece(index, "x")
        finally:
            self.steps_run.append(steps)
        return ["x" * max_new_tokens for _ in prompts]


class Call:
    def __init__(self, streaming, cancel_after=None, steps=50):
        self.prompt, self.max_new_tokens, self.streaming = "hi", steps, streaming
        self.cancel_after = cancel_after  # pieces streamed before the client goes away
        self.pieces, self.outcome = 0, None
        self.done = threading.Event()

    def cancelled(self):
        return self.cancel_after is not None and self.pieces >= self.cancel_after

    def stream(self, piece):
        self.pieces += 1

    def reply(self, text):
        self.outcome = ("reply", text)
        self.done.set()

    def fail(self, message, code=ErrorCode.INTERNAL):
        self.outcome = ("fail", code)
        self.done.set()


def sample(calls, steps=50):
    engine = ScriptedEngine()
    model = GemmaModel(engine)
    try:
        model._sample(steps, calls)
    finally:
        model.close()
    assert all(call.done.is_set() for call in calls)
    return engine


def test_generation_stops_once_every_streaming_client_has_gone():
    calls = [Call(streaming=True, cancel_after=3), Call(streaming=True, cancel_after=1)]
    engine = sample(calls)
    assert engine.steps_run == [3]  # the first piece after the last client left ends it
    assert [call.outcome for call in calls] == [("fail", ErrorCode.CANCELLED)] * 2


def test_generation_goes_on_while_one_client_of_the_batch_still_waits():
    gone, waiting = Call(streaming=True, cancel_after=2), Call(streaming=True)
    engine = sample([gone, waiting])
    assert engine.steps_run == [50]
    assert gone.outcome == ("fail", ErrorCode.CANCELLED) and gone.pieces == 2
    assert waiting.outcome == ("reply", "") and waiting.pieces == 50


def test_a_waiting_unary_call_keeps_a_cancelled_stream_s_batch_going():
    gone, unary = Call(streaming=True, cancel_after=1), Call(streaming=False)
    engine = sample([gone, unary])
    assert engine.steps_run == [50]
    assert unary.outcome == ("reply", "x" * 50) and unary.pieces == 0
    assert gone.outcome == ("fail", ErrorCode.CANCELLED)
