"""Times one Adam training step of the paper's classifier: LARNN against torch.nn.LSTM.

Prints one JSON line {"larnn_s", "lstm_s", "ratio", "peak_rss_mb", "device", "threads"}
for the published UCI HAR config (batch 256 x 128 steps x 9 inputs), then how the LARNN
step time grows with the sequence length T and the window k (same config otherwise).

    python3 bench/step_time.py [--device cpu|cuda] [--repeats 5] [--no-scaling]
    python3 bench/step_time.py --profile      # torch.profiler table of one LARNN step
"""
import argparse
import json
import pathlib
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import larnn  # noqa: E402
from train import PAPER_CONFIG  # noqa: E402

BATCH, STEPS, INPUTS, CLASSES = 256, 128, 9, 6


def step_time(model_name, device, repeats, steps=STEPS, profile=False, **overrides):
    """Median seconds of one forward + backward + Adam step, after one warm-up step;
    with profile, also prints a torch.profiler table of one more step."""
    torch.manual_seed(0)
    config = {**PAPER_CONFIG, **overrides}
    model = larnn.ActivityClassifier(INPUTS, CLASSES, config, model_name, steps).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"])
    x = torch.randn(BATCH, steps, INPUTS, device=device)
    y = torch.randint(CLASSES, (BATCH,), device=device)

    def step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if profile:
        with torch.profiler.profile() as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-scaling", action="store_true", help="skip the T and k sweeps")
    parser.add_argument("--profile", action="store_true", help="profile one LARNN step only")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.profile:
        step_time("larnn", device, 1, profile=True)
        return
    larnn_s = step_time("larnn", device, args.repeats)
    lstm_s = step_time("lstm", device, args.repeats)
    print(json.dumps({
        "larnn_s": round(larnn_s, 4), "lstm_s": round(lstm_s, 4),
        "ratio": round(larnn_s / lstm_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads()}), flush=True)
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
