"""The finisher thread: order, back-pressure, busy names and a failure that must not stop it."""

import threading
import time

from fluxworker.finisher import Finisher


def test_items_finish_in_order_and_names_stay_busy_until_done():
    release = threading.Event()
    done = []

    def finish(item):
        if item == "first":
            release.wait(10)
        done.append(item)

    finisher = Finisher(finish, depth=1)
    finisher.start()
    finisher.submit("a.json", "first")
    assert finisher.busy("a.json")
    submitted = threading.Event()
    threading.Thread(target=lambda: (finisher.submit("b.json", "second"), finisher.submit("c.json", "third"),
                                     submitted.set()), daemon=True).start()
    time.sleep(0.3)
    assert not submitted.is_set()  # depth 1: the third waits while the first is unfinished
    release.set()
    assert submitted.wait(10)
    finisher.drain()
    assert done == ["first", "second", "third"]
    assert not finisher.busy("a.json") and finisher.busy_names() == []
    finisher.close()


def test_a_failing_item_is_logged_and_the_next_still_finishes(caplog):
    done = []

    def finish(item):
        if item == "bad":
            raise RuntimeError("disk on fire")
        done.append(item)

    finisher = Finisher(finish)
    finisher.start()
    finisher.submit("bad.json", "bad")
    finisher.submit("good.json", "good")
    finisher.close()
    assert done == ["good"]
    assert "could not finish bad.json" in caplog.text and "disk on fire" in caplog.text


def test_close_finishes_what_was_submitted():
    done = []
    finisher = Finisher(lambda item: (time.sleep(0.05), done.append(item)), depth=4)
    finisher.start()
    for n in range(4):
        finisher.submit(f"{n}.json", n)
    finisher.close()
    assert done == [0, 1, 2, 3]


def test_a_held_item_waits_for_release_and_stays_busy_meanwhile():
    done = []
    arrived = threading.Event()
    finisher = Finisher(lambda item: (done.append(item), arrived.set()))
    finisher.start()
    finisher.hold("a.json", "first")
    assert finisher.busy("a.json")
    assert not arrived.wait(0.3) and done == []  # the thread has not been given it
    finisher.release()
    assert arrived.wait(10) and done == ["first"]
    finisher.drain()
    assert not finisher.busy("a.json")

    finisher.hold("b.json", "second")
    finisher.hold("c.json", "third")
    finisher.close()  # closing finishes held items too, in order
    assert done == ["first", "second", "third"]
