"""The soak benchmark's analysis, stream and pause gate on synthetic inputs."""

from __future__ import annotations

import itertools
import os
import signal
import threading

import numpy as np
import pytest

from kvshare.bench.soak import (
    Caps,
    Check,
    ProcessTree,
    Quiet,
    Sample,
    Served,
    analyse,
    directory_bytes,
    family_stream,
    first_difference,
    growth,
    hit_rate_slope,
    least_squares_slope,
    max_over_cap,
    per_minute_hit_rates,
    prompt_families,
    sized_caps,
    slope_standard_error,
)


def test_slope_of_a_line_is_exact_and_needs_two_points():
    xs = [0.5, 1.5, 2.5, 3.5]
    assert least_squares_slope(xs, [0.6 - 0.02 * x for x in xs]) == pytest.approx(-0.02)
    assert least_squares_slope(xs, [0.4, 0.6, 0.4, 0.6]) == pytest.approx(0.04)
    assert least_squares_slope([1.0], [0.5]) is None
    assert least_squares_slope([1.0, 1.0], [0.5, 0.7]) is None
    with pytest.raises(ValueError, match="differ in length"):
        least_squares_slope([1.0, 2.0], [0.5])


def test_growth_compares_the_last_window_with_the_first_after_warmup():
    times = list(range(0, 600, 10))
    # Large during warm-up (< 120 s), 100 after it, 120 over the last 60 s.
    values = [500 if t < 120 else 120 if t > 540 else 100 for t in times]
    assert growth(times, values, 120, 600, 60) == pytest.approx(0.2)
    assert growth(times, [100] * len(times), 120, 600, 60) == pytest.approx(0.0)
    shrinking = [100 if t < 540 else 80 for t in times]
    assert growth(times, shrinking, 120, 600, 60) == pytest.approx(-0.2)
    assert growth(times, values, 700, 800, 60) is None  # no sample in the windows


def test_over_cap_is_the_largest_excess_and_negative_while_held():
    assert max_over_cap([90, 101, 99], 100) == 1
    assert max_over_cap([90, 95], 100) == -5
    assert max_over_cap([], 100) is None


def served(t_s: float, claimed: int, error: str = "") -> Served:
    return Served(t_s, "engine-a", "pass-0", 800, claimed, claimed // 2, 0.1, error)


def test_hit_rates_per_full_minute_leave_failures_out():
    requests = [served(10, 300), served(20, 0), served(30, 0, "HTTPError"),
                served(70, 300), served(80, 300), served(130, 300)]
    # Minute 2 is cut short by the end of a 2.5-minute run.
    assert per_minute_hit_rates(requests, 2.5) == [(0, 0.5, 2), (1, 1.0, 2)]


def test_hit_rate_slope_ignores_the_warmup_minutes():
    rates = [(0, 0.0, 10), (1, 0.2, 10), (2, 0.5, 10), (3, 0.5, 10), (4, 0.5, 10)]
    assert hit_rate_slope(rates, warmup_minutes=2) == (pytest.approx(0.0), pytest.approx(0.0))
    assert hit_rate_slope(rates, warmup_minutes=0)[0] > 0.1


def test_slope_standard_error_of_a_noisy_series():
    assert slope_standard_error([0, 1, 2, 3], [0, 1, 0, 1]) == pytest.approx(0.08 ** 0.5)
    assert slope_standard_error([0, 1, 2], [1, 2, 3]) == pytest.approx(0.0)
    assert slope_standard_error([0, 1], [0, 1]) is None


def test_family_stream_keeps_the_reuse_distance_and_changes_tenant_each_pass():
    families = [[0, 1, 2], [3, 4], [5, 6, 7, 8]]
    stream = list(itertools.islice(family_stream(families, active=2), 40))
    members = {p: i for i, family in enumerate(families) for p in family}
    pass_zero = [p for tenant, p in stream if tenant == "pass-0"]
    assert sorted(pass_zero) == list(range(9))  # every prompt once in the first pass
    for family in families:  # each family's members in arrival order
        assert [p for p in pass_zero if members[p] == members[family[0]]] == family
    # The next member of a family comes one turn (2 requests) after the previous one.
    position = {request: i for i, request in enumerate(stream)}
    for (tenant, p), i in position.items():
        if p in (1, 4):
            assert position[(tenant, p - 1)] == i - 2
    assert {tenant for tenant, _ in stream} >= {"pass-0", "pass-1", "pass-2"}
    with pytest.raises(ValueError, match="active >= 1"):
        next(family_stream(families, active=0))


def test_prompt_families_link_near_duplicates_and_drop_loners():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 32))
    rows = [base[0], base[1], base[0] + 0.01, base[2], base[1] + 0.01, base[0] + 0.02]
    embeddings = np.array([r / np.linalg.norm(r) for r in rows], np.float32)
    assert prompt_families(embeddings, 0.05) == [[0, 2, 5], [1, 4]]


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_caps_hold_fewer_prompts_than_the_reuse_window_in_memory():
    caps = sized_caps(mean_prompt_kv_bytes=20 << 20, families=16, chunk_bytes=6 << 20)
    assert caps == Caps(cpu_bytes=80 << 20, disk_bytes=640 << 20, redis_bytes=160 << 20,
                        index_entries=64)
    tiny = sized_caps(mean_prompt_kv_bytes=1 << 20, families=1, chunk_bytes=6 << 20)
    assert tiny.cpu_bytes == tiny.redis_bytes == 24 << 20  # a prompt's chunks always fit


def sample(t_s: float, rss: int, disk: int, shared: int = 0) -> Sample:
    return Sample(t_s, {"daemon": rss}, {"daemon": 40}, disk, 50, 10,
                  {"cpu": int(t_s), "disk": 0}, shared_bytes={"daemon": shared},
                  shadow_checks={"engine-a": int(t_s >= 300), "engine-b": int(t_s >= 60)})


def check(check_id: str, outcome: str, first: int | None = None) -> Check:
    return Check(check_id, 0.0, "engine-a", "engine-b", 800, outcome, first_difference=first)


def test_analyse_reports_the_headline_figures():
    # RSS grows by 200, of which 100 is shared memory touched late: anonymous 900 -> 1000.
    samples = [sample(t, 1000 if t < 300 else 1200, 90 if t != 200 else 130,
                      shared=100 if t < 300 else 200)
               for t in range(0, 601, 10)]
    requests = [served(t, 300 if t % 20 else 0) for t in range(5, 600, 5)]  # 3 hits in 4
    checks = [check("check-1", "match"), check("check-2", "mismatch", 3),
              check("check-3", "other_split")]
    caps = Caps(cpu_bytes=10, disk_bytes=100, redis_bytes=100, index_entries=64)
    summary = analyse(samples, requests, checks, caps, minutes=10, warmup_minutes=2)
    assert summary["rss_growth"]["daemon"] == pytest.approx(0.2)
    assert summary["anonymous_rss_growth"]["daemon"] == pytest.approx(100 / 900)
    assert summary["fd_growth"]["daemon"] == pytest.approx(0.0)
    assert summary["disk_max_over_cap"] == 30
    assert summary["wrong_answers"] == 1 and summary["checks_compared"] == 2
    assert summary["mismatches"] == [{"check_id": "check-2", "first_difference": 3}]
    assert summary["checks_not_compared"]["other_split"] == 1
    assert summary["hit_rate_slope"] == pytest.approx(0.0)
    assert summary["hit_rate_after_warmup"] == pytest.approx(0.75)
    assert summary["evictions"] == {"cpu": 600, "disk": 0}
    assert summary["first_shadow_check_s"] == {"engine-a": 300, "engine-b": 60}
    assert summary["shadow_model_loaded_after_warmup"] == ["engine-a"]  # warm-up: 120 s


def test_quiet_lets_a_check_in_only_once_the_requests_in_flight_are_done():
    quiet = Quiet()
    holding, release, checked = threading.Event(), threading.Event(), threading.Event()

    def request() -> None:
        with quiet.shared():
            holding.set()
            release.wait(10)

    def run_check() -> None:
        with quiet.exclusive():
            checked.set()

    requester = threading.Thread(target=request)
    requester.start()
    assert holding.wait(10)
    checker = threading.Thread(target=run_check)
    checker.start()
    assert not checked.wait(0.3)  # a request is in flight
    release.set()
    assert checked.wait(10)
    requester.join(10)
    checker.join(10)


def test_process_tree_samples_each_process_and_counts_one_that_is_gone(tmp_path):
    import subprocess
    import sys

    # A parent running a child (as kvshare serve runs vLLM), both waiting on stdin.
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; child = subprocess.Popen("
         "[sys.executable, '-m', 'json.tool']); print(child.pid, flush=True); child.wait()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        tree = ProcessTree("engine-a", parent.pid)
        assert sorted(tree.processes) == ["engine-a", "engine-a/tool"]
        rss, shared, fds = {}, {}, {}
        tree.sample(rss, shared, fds)
        assert set(rss) == set(shared) == set(fds) == {"engine-a", "engine-a/tool"}
        assert all(rss[name] > shared[name] >= 0 for name in rss)
        os.kill(child_pid, signal.SIGKILL)
        parent.wait(10)  # the parent exits once its child is gone
        rss, shared, fds = {}, {}, {}
        tree.sample(rss, shared, fds)
        assert rss == {} and tree.gone == {"engine-a", "engine-a/tool"}
    finally:
        parent.kill()
        parent.wait()


def test_directory_bytes_counts_every_file_below(tmp_path):
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / "chunk").write_bytes(b"x" * 1000)
    (tmp_path / ".chunk.tmp").write_bytes(b"x" * 24)
    assert directory_bytes(tmp_path) == 1024
