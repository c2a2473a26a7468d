"""``OpenStep`` alone (``gradscope.monitor.schedule``): the sampling schedule of ``watch()``."""

from gradscope.monitor.schedule import OpenStep


def test_sampled_steps_and_histogram_steps_follow_every_and_histogram_every():
    open_step = OpenStep(every=3, histogram_every=2)
    seen = []
    for step in range(13):
        open_step.move_to(step)
        assert open_step.index == step
        seen.append((open_step.sampled, open_step.sampled and open_step.has_histograms(step)))
    assert [s for s, (sampled, _) in enumerate(seen) if sampled] == [0, 3, 6, 9, 12]
    assert [s for s, (_, histogram) in enumerate(seen) if histogram] == [0, 6, 12]
    assert open_step.is_sampled(9) and not open_step.is_sampled(10)


def test_state_round_trip_moves_the_step():
    source, target = OpenStep(4, 32), OpenStep(4, 32)
    source.move_to(7)
    assert source.state_dict() == {"step": 7}
    target.load_state_dict(source.state_dict())
    assert (target.index, target.sampled) == (7, False)
    target.load_state_dict({"step": 8})
    assert (target.index, target.sampled) == (8, True)
