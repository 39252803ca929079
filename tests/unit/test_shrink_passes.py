"""The end of precopy: when another pass while the guest runs is worth it (ShrinkPasses)."""
from livemig.options import PARAMETERS
from livemig.outgoing import SHRINK_DONE_BYTES, ShrinkPasses

MiB = 1 << 20


def test_passes_go_on_while_each_merge_finds_a_quarter_less():
    s = ShrinkPasses()
    assert s.another(16 * MiB, 0.0, 8, 300, 0.001, 1.0)
    assert s.another(9 * MiB, 0.01, 8, 300, 0.001, 1.0)  # 9 <= 0.75 * 16
    assert s.another(6 * MiB, 0.02, 8, 300, 0.001, 1.0)  # 6 <= 0.75 * 9
    assert not s.another(5 * MiB, 0.03, 8, 300, 0.001, 1.0)  # 5 > 0.75 * 6: the guest dirties as fast as it goes
    assert s.passes == 3


def test_a_small_rest_stops_at_once():
    s = ShrinkPasses()
    assert not s.another(SHRINK_DONE_BYTES, 0.0, 8, 300, 0.001, 1.0)
    assert s.another(SHRINK_DONE_BYTES + 4096, 0.0, 8, 300, 0.001, 1.0)


def test_the_pass_count_and_the_time_are_bounded():
    s = ShrinkPasses()
    assert s.another(64 * MiB, 0.0, 2, 300, 0.001, 1.0) and s.another(32 * MiB, 0.1, 2, 300, 0.001, 1.0)
    assert not s.another(16 * MiB, 0.2, 2, 300, 0.001, 1.0)  # two passes done
    t = ShrinkPasses()
    assert t.another(64 * MiB, 5.0, 8, 300, 0.001, 1.0)
    assert not t.another(16 * MiB, 5.31, 8, 300, 0.001, 1.0)  # over 300 ms spent: the downtime limit's worth


def test_no_pass_that_would_take_about_as_long_as_the_last():
    s = ShrinkPasses()
    # a throttled link: sending what is left takes 125 ms, the last pass 150 ms; the guest would
    # dirty about as much again meanwhile
    assert not s.another(16 * MiB, 0.0, 8, 300, 0.125, 0.150)
    assert s.another(16 * MiB, 0.0, 8, 300, 0.010, 0.150)


def test_zero_passes_is_qemus_order():
    s = ShrinkPasses()
    assert not s.another(64 * MiB, 0.0, 0, 300, 0.001, 1.0) and s.passes == 0


def test_the_parameter_defaults_on():
    default, kind, lo, _ = PARAMETERS["x-shrink-passes"]
    assert kind == "int" and lo == 0 and default > 0
