"""The memory policy alone: fake snapshots and a fake clock in, decisions out."""

from __future__ import annotations

import random

import pytest

from supervisor.policy import Act, Bands, MemoryPolicy, PendingView, Snapshot, WorkerView, remaining_growth

pytestmark = pytest.mark.timeout(30)


def snap(workers=(), pending=(), now=100.0, budget=10_000.0, available=1e9, reserve=1000.0, baseline=1000.0,
         max_workers=4, **kw) -> Snapshot:
    return Snapshot(now=now, budget_mb=budget, reserve_mb=reserve, available_mb=available, workers=tuple(workers),
                    pending=tuple(pending), predicted_baseline_mb=baseline, max_workers=max_workers, **kw)


def idle(i, pss=1000.0):
    return WorkerView(id=i, state="ready", pss_mb=pss, uss_mb=pss, baseline_uss_mb=pss, idle_since=0.0)


def busy(i, uss=1000.0, base=1000.0, growth=1000.0, started=0.0, pss=None):
    return WorkerView(id=i, state="busy", pss_mb=pss if pss is not None else uss, uss_mb=uss, baseline_uss_mb=base,
                      file=f"f{i}.cha", growth_mb=growth, file_started_at=started)


def pend(name, growth, baseline=1000.0, central=None):
    return PendingView(file=name, peak_mb=baseline + growth, growth_mb=growth,
                       central_peak_mb=central if central is not None else baseline + growth / 1.2)


def acts(decisions):
    return [(d.act, d.worker, d.file) for d in decisions]


def test_spawns_one_worker_when_a_file_waits_and_fits():
    p = MemoryPolicy(Bands())
    out = p.decide(snap(pending=[pend("a", 500)]))
    assert acts(out) == [(Act.SPAWN, None, "a")]


def test_no_second_spawn_while_one_is_starting():
    p = MemoryPolicy(Bands())
    starting = WorkerView(id=1, state="starting", pss_mb=50, uss_mb=50)
    assert p.decide(snap(workers=[starting], pending=[pend("a", 500), pend("b", 500)])) == []


def test_the_next_worker_starts_loading_once_the_last_has_loaded_within_its_predicted_baseline():
    p = MemoryPolicy(Bands())
    work = [pend("a", 500), pend("b", 500)]
    loaded = WorkerView(id=1, state="starting", pss_mb=900, uss_mb=900, loaded_private_mb=900)
    probes = dict(baseline=1000.0, probe_growth_mb=300.0)  # a warm model says what the probes take
    assert acts(p.decide(snap(workers=[loaded], pending=work, **probes))) == [(Act.SPAWN, None, "b")]
    # Cold: nothing says what its probes will take (they are what measures it): wait for READY.
    assert p.decide(snap(workers=[loaded], pending=work, baseline=1000.0)) == []
    # Loaded over the prediction: the baseline is not what was thought, so wait for its READY.
    heavy = WorkerView(id=1, state="starting", pss_mb=1200, uss_mb=1200, loaded_private_mb=1200)
    assert p.decide(snap(workers=[heavy], pending=work, **probes)) == []
    # A probing worker is still a starting one: it may still reach its predicted baseline plus its
    # probes' growth (900 used, 400 more to 1300); the head "a" grows 200 beyond the probes there,
    # and a new worker needs 1000 + 500: 3000 in all.
    assert p.decide(snap(workers=[loaded], pending=work, budget=2950.0, **probes)) == []
    assert acts(p.decide(snap(workers=[loaded], pending=work, budget=3050.0, **probes))) == [(Act.SPAWN, None, "b")]
    # What it holds is counted once: read higher (in its probes), the charge shrinks by as much.
    probing = WorkerView(id=1, state="starting", pss_mb=1250, uss_mb=1250, loaded_private_mb=900)
    assert acts(p.decide(snap(workers=[probing], pending=work, budget=3050.0, **probes))) == [(Act.SPAWN, None, "b")]
    # The probing worker takes the head once READY: a new worker must leave the head its room
    # (3000, 2700 beyond the probes), even where a smaller file would fit beside the new worker,
    # which runs its own probes (300) before its file (200).
    big_first = [pend("big", 3000), pend("small", 200)]
    assert p.decide(snap(workers=[loaded], pending=big_first, budget=5250.0, **probes)) == []
    assert acts(p.decide(snap(workers=[loaded], pending=big_first, budget=5350.0, **probes))) == [
        (Act.SPAWN, None, "small")]


def test_a_cold_starting_worker_is_charged_its_whole_baseline_beside_what_it_holds():
    # Nothing says what its probes take: the predicted baseline again stands for them.
    p = MemoryPolicy(Bands())
    starting = WorkerView(id=1, state="starting", pss_mb=800, uss_mb=800)
    s = snap(workers=[starting, idle(2)], pending=[pend("a", 1000)], budget=4900.0, baseline=1000.0)
    # 800 + 1000 (starting) + 1000 (idle) = 2800 committed; "a" needs 1000 more
    assert acts(p.decide(s)) == [(Act.ADMIT, 2, "a")]
    assert p.decide(snap(workers=[starting, idle(2)], pending=[pend("a", 2200)], budget=4900.0,
                         baseline=1000.0)) == []


def test_spawn_counts_starting_baseline_and_respects_max_workers():
    p = MemoryPolicy(Bands())
    ws = [busy(i, uss=1000, growth=0) for i in range(1, 5)]
    assert p.decide(snap(workers=ws, pending=[pend("a", 100)], max_workers=4)) == []


def test_admits_into_idle_worker_when_it_fits():
    p = MemoryPolicy(Bands())
    out = p.decide(snap(workers=[idle(1)], pending=[pend("a", 2000)]))
    assert acts(out) == [(Act.ADMIT, 1, "a")]


def test_admission_counts_remaining_growth_of_running_files():
    p = MemoryPolicy(Bands())
    # Running file predicted to grow 5000 but only 1000 seen so far: 4000 still promised.
    running = busy(1, uss=2000, base=1000, growth=5000)
    ws = [running, idle(2)]
    # used = 3000, committed = 3000 + 4000 = 7000; room = 3000
    assert acts(p.decide(snap(workers=ws, pending=[pend("big", 3500)]))) == []
    assert acts(p.decide(snap(workers=ws, pending=[pend("ok", 2500)]))) == [(Act.ADMIT, 2, "ok")]


def test_first_fit_in_queue_order_backfills_smaller_files():
    p = MemoryPolicy(Bands())
    ws = [busy(1, uss=1000, growth=6000), idle(2)]
    out = p.decide(snap(workers=ws, pending=[pend("large", 5000), pend("small", 500)]))
    assert acts(out) == [(Act.ADMIT, 2, "small")]


def test_host_available_minus_reserve_limits_admission():
    p = MemoryPolicy(Bands())
    # Budget has room, but the host (other users) only has 1500 left above the reserve.
    out = p.decide(snap(workers=[idle(1)], pending=[pend("a", 2000)], available=2500, reserve=1000))
    assert out == []
    out = p.decide(snap(workers=[idle(1)], pending=[pend("a", 1200)], available=2500, reserve=1000))
    assert acts(out) == [(Act.ADMIT, 1, "a")]


def test_other_supervisors_reservations_count():
    p = MemoryPolicy(Bands())
    out = p.decide(snap(workers=[idle(1)], pending=[pend("a", 2000)], available=4000, reserve=1000,
                        others_reserved_mb=1500))
    assert out == []


def test_stop_admitting_above_admit_band():
    p = MemoryPolicy(Bands())
    ws = [busy(1, uss=9200, growth=9000, base=1000), idle(2, pss=0)]
    assert p.decide(snap(workers=ws, pending=[pend("a", 10)])) == []


def test_pause_newest_file_above_pause_band_then_resume_with_hysteresis():
    clock = [100.0]
    p = MemoryPolicy(Bands(pause_cooldown_s=1.0))
    old = busy(1, uss=5000, growth=5000, started=10.0)
    new = busy(2, uss=4600, growth=5000, started=20.0)
    out = p.decide(snap(workers=[old, new], now=clock[0]))
    assert acts(out) == [(Act.PAUSE, 2, "f2.cha")]
    paused = WorkerView(**{**new.__dict__, "state": "paused", "paused_at": clock[0]})
    # Still above resume band: stays paused, nothing else happens.
    clock[0] += 2
    assert p.decide(snap(workers=[old, paused], now=clock[0])) == []
    # Old file finished: memory dropped below resume band -> resume the paused one.
    clock[0] += 2
    done = idle(1, pss=1000)
    out = p.decide(snap(workers=[done, paused], now=clock[0]))
    assert acts(out) == [(Act.RESUME, 2, "f2.cha")]


def test_resume_oldest_paused_first():
    p = MemoryPolicy(Bands())
    a = WorkerView(id=1, state="paused", pss_mb=1500, uss_mb=1500, baseline_uss_mb=1000, file="a", growth_mb=600,
                   file_started_at=5, paused_at=50)
    b = WorkerView(id=2, state="paused", pss_mb=1500, uss_mb=1500, baseline_uss_mb=1000, file="b", growth_mb=600,
                   file_started_at=6, paused_at=40)
    out = p.decide(snap(workers=[a, b]))
    assert acts(out) == [(Act.RESUME, 2, "b")]


def test_kill_above_guard_prefers_worker_furthest_over_prediction_then_settles():
    p = MemoryPolicy(Bands(kill_settle_s=3.0))
    a = busy(1, uss=6000, base=1000, growth=1000, started=10)  # 4000 over its prediction
    b = busy(2, uss=4500, base=1000, growth=4000, started=20)  # within prediction, newest
    out = p.decide(snap(workers=[a, b], now=100))
    assert acts(out) == [(Act.KILL, 1, "f1.cha")]
    # Memory has not fallen yet (killed worker not reaped): no second kill during the settle time.
    killed = WorkerView(**{**a.__dict__, "state": "killed"})
    assert p.decide(snap(workers=[killed, b], now=101)) == []
    # After the settle time a still-over-guard pool gets another kill.
    out = p.decide(snap(workers=[busy(2, uss=11000, base=1000, growth=4000, started=20)], now=104))
    assert acts(out) == [(Act.KILL, 2, "f2.cha")]


def test_kill_newest_when_nobody_is_over_prediction():
    p = MemoryPolicy(Bands())
    a = busy(1, uss=5200, growth=5000, started=10)
    b = busy(2, uss=5200, growth=5000, started=20)
    assert acts(p.decide(snap(workers=[a, b]))) == [(Act.KILL, 2, "f2.cha")]


def test_paused_too_long_is_killed():
    p = MemoryPolicy(Bands(max_pause_s=60))
    w = WorkerView(id=1, state="paused", pss_mb=9000, uss_mb=9000, baseline_uss_mb=1000, file="a", growth_mb=9000,
                   file_started_at=0, paused_at=10)
    other = busy(2, uss=500, growth=100)
    out = p.decide(snap(workers=[w, other], now=100))
    assert acts(out) == [(Act.KILL, 1, "a")]
    assert out[0].reason == "paused too long"


def test_file_over_budget_runs_alone_after_others_finish():
    p = MemoryPolicy(Bands())
    big = pend("huge", 9500, central=9000)  # peak 10500 > budget 10000, central 9000 fits
    # Others still running: wait.
    assert p.decide(snap(workers=[busy(1, growth=100), idle(2)], pending=[big])) == []
    # Two idle workers: retire one (the larger) first.
    out = p.decide(snap(workers=[idle(1, pss=900), idle(2, pss=1200)], pending=[big]))
    assert acts(out) == [(Act.RETIRE, 2, None)]
    out = p.decide(snap(workers=[idle(1, pss=900)], pending=[big]))
    assert acts(out) == [(Act.ADMIT, 1, "huge")]


def test_file_that_cannot_fit_even_alone_is_rejected_once_with_figures():
    p = MemoryPolicy(Bands())
    hopeless = pend("hopeless", 20000, central=15000)
    out = p.decide(snap(pending=[hopeless, pend("ok", 100)]))
    assert out[0].act is Act.REJECT and out[0].file == "hopeless"
    assert out[0].reason == "needs ~14.6 GiB, budget is 9.77 GiB"
    assert out[1:] and out[1].act is Act.SPAWN
    # Not rejected twice.
    assert all(d.act is not Act.REJECT for d in p.decide(snap(pending=[hopeless])))


def test_idle_worker_blocking_a_large_file_is_retired_largest_first():
    p = MemoryPolicy(Bands())
    ws = [idle(1, pss=3000), idle(2, pss=3500), idle(3, pss=2000)]
    # committed 8500, room 1500: a 4000 growth file fits only if idle workers go.
    out = p.decide(snap(workers=ws, pending=[pend("big", 4000)]))
    assert acts(out) == [(Act.RETIRE, 2, None)]


def test_draining_admits_nothing_and_resumes_paused():
    p = MemoryPolicy(Bands())
    paused = WorkerView(id=1, state="paused", pss_mb=8600, uss_mb=8600, baseline_uss_mb=1000, file="a",
                        growth_mb=9000, file_started_at=0, paused_at=90)
    out = p.decide(snap(workers=[paused, idle(2)], pending=[pend("b", 10)], draining=True))
    assert acts(out) == [(Act.RESUME, 1, "a")]


def test_psi_stall_blocks_admission_and_pauses():
    p = MemoryPolicy(Bands())
    assert p.decide(snap(workers=[idle(1)], pending=[pend("a", 10)], psi_some10=50.0)) == []
    out = p.decide(snap(workers=[busy(1, started=1), busy(2, started=2)], psi_full10=80.0))
    assert acts(out) == [(Act.PAUSE, 2, "f2.cha")]


def test_killed_workers_memory_still_counts_until_reaped():
    p = MemoryPolicy(Bands(kill_settle_s=0.0))
    killed = WorkerView(id=1, state="killed", pss_mb=8000, uss_mb=8000, baseline_uss_mb=1000)
    assert p.decide(snap(workers=[killed, idle(2)], pending=[pend("a", 2000)])) == []


def test_idle_retirement_in_watch_mode():
    p = MemoryPolicy(Bands())
    w = WorkerView(id=1, state="ready", pss_mb=1000, uss_mb=1000, baseline_uss_mb=1000, idle_since=0.0)
    assert acts(p.decide(snap(workers=[w], now=700, idle_retire_s=600))) == [(Act.RETIRE, 1, None)]
    assert p.decide(snap(workers=[w], now=700)) == []


def test_remaining_growth():
    assert remaining_growth(busy(1, uss=1500, base=1000, growth=2000)) == 1500
    assert remaining_growth(busy(1, uss=5000, base=1000, growth=2000)) == 0
    assert remaining_growth(idle(1)) == 0


def test_sum_of_admitted_predictions_never_exceeds_budget_randomised():
    """Drive the policy with a simulated pool: promises never exceed the budget."""
    rng = random.Random(7)
    for trial in range(30):
        p = MemoryPolicy(Bands())
        budget = rng.uniform(4000, 20000)
        base = rng.uniform(200, 1500)
        files = [pend(f"f{i}", rng.uniform(10, budget * 0.6)) for i in range(rng.randint(5, 30))]
        workers: dict[int, WorkerView] = {}
        now, next_id = 0.0, 1
        for _ in range(400):
            now += 1
            pending = [f for f in files if f.peak_mb <= budget]
            out = p.decide(snap(workers=workers.values(), pending=pending, now=now, budget=budget, baseline=base,
                                max_workers=6, available=1e9))
            for d in out:
                if d.act is Act.SPAWN:
                    workers[next_id] = WorkerView(id=next_id, state="ready", pss_mb=base, uss_mb=base,
                                                  baseline_uss_mb=base, idle_since=now)
                    next_id += 1
                elif d.act is Act.ADMIT:
                    f = next(f for f in files if f.file == d.file)
                    files.remove(f)
                    w = workers[d.worker]
                    workers[d.worker] = WorkerView(id=w.id, state="busy", pss_mb=base, uss_mb=base,
                                                   baseline_uss_mb=base, file=f.file, growth_mb=f.growth_mb,
                                                   file_started_at=now)
                elif d.act is Act.RETIRE:
                    workers.pop(d.worker)
            promised = sum(w.pss_mb + remaining_growth(w) for w in workers.values())
            assert promised <= budget + 1e-6, (trial, promised, budget)
            # Files finish at random; growth is realised exactly as predicted.
            for wid, w in list(workers.items()):
                if w.state == "busy" and rng.random() < 0.3:
                    workers[wid] = WorkerView(id=wid, state="ready", pss_mb=base, uss_mb=base, baseline_uss_mb=base,
                                              idle_since=now)
            if not files and all(w.state == "ready" for w in workers.values()):
                break
        assert not [f for f in files if f.peak_mb <= budget], f"trial {trial}: files left behind"


def test_the_supervisors_own_memory_counts_against_the_budget():
    p = MemoryPolicy(Bands())
    # 9000 of peak fits a 10000 budget, but not beside 1500 held by the supervisor and its zygote.
    out = p.decide(snap(pending=[pend("a", 8000, central=9000)], overhead_mb=1500))
    assert out[0].act is Act.REJECT and "beside the supervisor" in out[0].reason
    # Used memory includes the overhead: 8800 of workers + 1500 is over the guard.
    out = p.decide(snap(workers=[busy(1, uss=8800, growth=9000)], overhead_mb=1500))
    assert acts(out) == [(Act.KILL, 1, "f1.cha")]


def test_idle_workers_that_block_a_file_on_the_host_are_retired():
    p = MemoryPolicy(Bands())
    # The budget has room, but the host does not (another user holds it): two idle workers of ours
    # hold memory that the waiting file needs, so the largest is retired rather than waiting forever.
    out = p.decide(snap(workers=[idle("w1", pss=300), idle("w2", pss=400)], pending=[pend("a", 1500)],
                        available=1200.0, reserve=100.0))
    assert acts(out) == [(Act.RETIRE, "w2", None)]


def test_nothing_is_admitted_or_spawned_while_host_memory_cannot_be_read():
    p = MemoryPolicy(Bands())
    assert p.decide(snap(workers=[idle("w1")], pending=[pend("a", 100)], available=None)) == []
    assert p.decide(snap(pending=[pend("a", 100)], available=None)) == []


def test_a_file_growing_past_its_prediction_is_held_back_and_paused_before_the_guard():
    p = MemoryPolicy(Bands())
    # w1's file was predicted to grow 1000 MiB; it has grown 2000 already and its progress says it
    # will grow 3000 more: committed passes the guard although used is still low.
    fast = WorkerView(id="w1", state="busy", pss_mb=3000, uss_mb=3000, baseline_uss_mb=1000, file="f1.cha",
                      growth_mb=1000, remaining_mb=3000, file_started_at=0.0)
    other = busy("w2", uss=1500, growth=500, started=5.0)
    out = p.decide(snap(workers=[fast, other, idle("w3")], pending=[pend("a", 100)], budget=8000))
    assert acts(out) == [(Act.PAUSE, "w2", "fw2.cha")]
    # Without the correction the same pool admits the waiting file.
    plain = WorkerView(id="w1", state="busy", pss_mb=3000, uss_mb=3000, baseline_uss_mb=1000, file="f1.cha",
                       growth_mb=1000, file_started_at=0.0)
    assert acts(MemoryPolicy(Bands()).decide(snap(workers=[plain, other, idle("w3")], pending=[pend("a", 100)],
                                                  budget=8000))) == [(Act.ADMIT, "w3", "a")]


def test_only_one_uncertain_large_file_runs_at_a_time():
    p = MemoryPolicy(Bands())
    big = PendingView(file="big", peak_mb=4000, growth_mb=3000, central_peak_mb=3500, uncertain=True)
    big2 = PendingView(file="big2", peak_mb=4000, growth_mb=3000, central_peak_mb=3500, uncertain=True)
    small = PendingView(file="small", peak_mb=1200, growth_mb=200, central_peak_mb=1100, uncertain=True)
    out = p.decide(snap(workers=[idle("w1"), idle("w2"), idle("w3")], pending=[big, big2, small], budget=12000))
    assert acts(out) == [(Act.ADMIT, "w1", "big"), (Act.ADMIT, "w2", "small")]
    # Once the model is trusted, large files are packed side by side.
    sure = [PendingView(file=f, peak_mb=4000, growth_mb=3000, central_peak_mb=3500) for f in ("big", "big2")]
    out = MemoryPolicy(Bands()).decide(snap(workers=[idle("w1"), idle("w2")], pending=sure, budget=12000))
    assert acts(out) == [(Act.ADMIT, "w1", "big"), (Act.ADMIT, "w2", "big2")]


def test_a_file_that_fits_the_pool_alone_is_not_left_waiting_beside_one_idle_worker():
    p = MemoryPolicy(Bands())
    # The idle worker measured a little more than the predicted baseline: the file's growth misses
    # the room by 1 MiB, but nothing else runs, so waiting frees nothing. It runs alone.
    w = WorkerView(id="w1", state="ready", pss_mb=1070, uss_mb=1070, baseline_uss_mb=1070, idle_since=0.0)
    out = p.decide(snap(workers=[w], pending=[pend("big", 8931)], budget=10_000, baseline=1000))
    assert acts(out) == [(Act.ADMIT, "w1", "big")] and out[0].reason == "runs alone"
