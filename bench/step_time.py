"""Times one Adam training step of the paper's classifier: LARNN against torch.nn.LSTM.

Prints one JSON line {"larnn_s", "lstm_s", "ratio", "eval_larnn_s", "eval_lstm_s",
"eval_ratio", "peak_rss_mb", "device", "threads", "backend"} for the published UCI HAR
config (training: batch 256 x 128 steps x 9 inputs; eval: a forward pass of batch
EVAL_BATCH without gradients), then how the LARNN step time grows with the sequence
length T and the window k (same config otherwise).

    python3 bench/step_time.py [--device cpu|cuda] [--repeats 5] [--no-scaling]
    python3 bench/step_time.py --corner       # the costliest corner of the search space
    python3 bench/step_time.py --profile      # torch.profiler table of one LARNN step
    python3 bench/step_time.py --contention   # quiet, beside a busy loop, beside a training
    python3 bench/step_time.py --fitting-cost # steps with fused/threads.py on and off, alternated

--contention times each model's training step and eval pass alone, beside a busy loop and
beside a second training of the same model (another process, started first), one JSON
line per cell with its median and worst step against the quiet median; with
LARNN_THREADS=fixed set, both processes keep torch's default thread count
(fused/threads.py), which shows the slowdown that the thread fitting prevents.

--corner times the LARNN training step alone at CORNER_CONFIG, with its peak RSS: run it
in a process of its own, since the peak RSS is the process's.
"""
import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import fused  # noqa: E402
import larnn  # noqa: E402
from larnn import PAPER_CONFIG  # noqa: E402

BATCH, STEPS, INPUTS, CLASSES = 256, 128, 9, 6
EVAL_BATCH = 1024
NEIGHBOURS = {"quiet": None,
              "busy loop": [sys.executable, "-c", "print('ready', flush=True)\nwhile True: pass"],
              "training": [sys.executable, __file__, "--neighbour"]}
# The most expensive configuration hyperopt_optimize.py's LARNN space can draw: the
# widest hidden size that is 3 x the most heads, the longest window, positional encoding
# (whose windows are built per step), three layers.
CORNER_CONFIG = dict(hidden_size=108, attention_heads=36, larnn_window_size=99,
                     use_positional_encoding=True, num_layers=3)


def step_time(model_name, device, repeats, steps=STEPS, profile=False, evaluate=False,
              warmup=1, all_times=False, before_step=None, **overrides):
    """Median seconds of one forward + backward + Adam step (with evaluate, of one
    forward pass of EVAL_BATCH in eval mode without gradients), after warmup steps (with
    all_times, the list of every timed step; repeats None: steps until killed, printing
    "ready" after the warm-up); before_step(i), if given, runs before timed step i; with
    profile, also prints a torch.profiler table of one more step."""
    torch.manual_seed(0)
    config = {**PAPER_CONFIG, **overrides}
    model = larnn.ActivityClassifier(INPUTS, CLASSES, config, model_name, steps).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"])
    x = torch.randn(EVAL_BATCH if evaluate else BATCH, steps, INPUTS, device=device)
    y = torch.randint(CLASSES, (BATCH,), device=device)

    def train_step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    def eval_step():
        model.eval()
        with torch.no_grad():
            model(x)

    def step():
        (eval_step if evaluate else train_step)()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    if repeats is None:
        print("ready", flush=True)
        while True:
            step()
    times = []
    for i in range(repeats):
        if before_step:
            before_step(i)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if profile:
        with torch.profiler.profile() as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return times if all_times else statistics.median(times)


def beside(neighbour, model_name):
    """A started neighbour process (None for "quiet"), once it printed "ready"."""
    command = NEIGHBOURS[neighbour]
    if command is None:
        return None
    if neighbour == "training":
        command = command + [model_name]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the {neighbour} neighbour did not start: {command}")
    return process


def contention(device, repeats, models):
    """One JSON line per (model, train or eval, neighbour): median and worst step time,
    each against the quiet median, after two warm-up steps (time for fused/threads.py to
    measure the neighbour)."""
    for model_name in models:
        for evaluate in (False, True):
            quiet = None
            for neighbour in NEIGHBOURS:
                process = beside(neighbour, model_name)
                try:
                    times = step_time(model_name, device, repeats, evaluate=evaluate,
                                      warmup=2, all_times=True)
                    threads = torch.get_num_threads()
                finally:
                    if process is not None:
                        process.kill()
                        process.wait()
                median = statistics.median(times)
                quiet = quiet or median
                print(json.dumps({
                    "model": model_name, "pass": "eval" if evaluate else "train",
                    "beside": neighbour, "median_s": round(median, 3),
                    "worst_s": round(max(times), 3), "median_vs_quiet": round(median / quiet, 2),
                    "worst_vs_quiet": round(max(times) / quiet, 2), "steps": len(times),
                    "threads_at_end": threads,
                    "thread_fitting": os.environ.get("LARNN_THREADS") != "fixed"}), flush=True)


def fitting_cost(device, repeats):
    """Per model, training steps alternately with fused/threads.py's fitting on and off
    (LARNN_THREADS), in one process: what the check costs on a quiet machine."""
    def toggle(i):  # even steps on, odd steps off
        if i % 2:
            os.environ["LARNN_THREADS"] = "fixed"
        else:
            os.environ.pop("LARNN_THREADS", None)

    for model_name in ("larnn", "lstm"):
        steps = step_time(model_name, device, 2 * repeats, all_times=True, before_step=toggle)
        os.environ.pop("LARNN_THREADS", None)
        times = {"on": steps[0::2], "off": steps[1::2]}
        print(json.dumps({"model": model_name, **{
            f"{stat.__name__}_{setting}_s": round(stat(values), 4)
            for setting, values in times.items() for stat in (statistics.median, min)}}),
            flush=True)


def peak_rss_mb():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-scaling", action="store_true", help="skip the T and k sweeps")
    parser.add_argument("--profile", action="store_true", help="profile one LARNN step only")
    parser.add_argument("--corner", action="store_true",
                        help="time and measure the LARNN step at CORNER_CONFIG only")
    parser.add_argument("--contention", action="store_true",
                        help="each model's steps quiet, beside a busy loop, beside a training")
    parser.add_argument("--fitting-cost", action="store_true",
                        help="steps with the thread fitting on and off, alternated")
    parser.add_argument("--models", nargs="+", choices=larnn.MODELS, default=larnn.MODELS,
                        help="with --contention: which models (default: all three)")
    parser.add_argument("--neighbour", choices=larnn.MODELS,
                        help=argparse.SUPPRESS)  # --contention's second training
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.neighbour:
        step_time(args.neighbour, device, None)
        return
    machine = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "threads": torch.get_num_threads(),
               "backend": "fused" if fused.applies(torch.zeros(1, device=device)) else "pytorch"}
    if args.profile:
        step_time("larnn", device, 1, profile=True)
        return
    if args.fitting_cost:
        fitting_cost(device, args.repeats)
        return
    if args.contention:
        contention(device, args.repeats, args.models)
        return
    if args.corner:
        larnn_s = step_time("larnn", device, args.repeats, **CORNER_CONFIG)
        print(json.dumps({"config": CORNER_CONFIG, "larnn_s": round(larnn_s, 4),
                          "peak_rss_mb": peak_rss_mb(), **machine}), flush=True)
        return
    larnn_s = step_time("larnn", device, args.repeats)
    lstm_s = step_time("lstm", device, args.repeats)
    eval_larnn_s = step_time("larnn", device, args.repeats, evaluate=True)
    eval_lstm_s = step_time("lstm", device, args.repeats, evaluate=True)
    print(json.dumps({
        "larnn_s": round(larnn_s, 4), "lstm_s": round(lstm_s, 4),
        "ratio": round(larnn_s / lstm_s, 2), "eval_larnn_s": round(eval_larnn_s, 4),
        "eval_lstm_s": round(eval_lstm_s, 4), "eval_ratio": round(eval_larnn_s / eval_lstm_s, 2),
        "peak_rss_mb": peak_rss_mb(), **machine}), flush=True)
    if args.no_scaling:
        return
    repeats = max(1, args.repeats // 2)
    for steps in (64, 128, 256, 512):
        s = step_time("larnn", device, repeats, steps=steps)
        print(json.dumps({"T": steps, "larnn_s": round(s, 4),
                          "s_per_step": round(s / steps, 5)}), flush=True)
    for window in (10, 38, 100):
        s = step_time("larnn", device, repeats, larnn_window_size=window)
        print(json.dumps({"window": window, "larnn_s": round(s, 4)}), flush=True)


if __name__ == "__main__":
    main()
