"""Where a train.py run's start-up goes: the template's own set-up calls, timed one by one, in the
order main() makes them, on the device and data the environment names (as the lab sets them).

    AUTORESEARCH_PROFILE=h100 AUTORESEARCH_DATA=DIR \\
        PYTHONPATH=src python bench/startup_timeline.py [--template PATH]
"""
import argparse
import sys
import time

from bench_train_gpu import TEMPLATE, load_template, make_loss_fn  # a script beside this one


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--template", default=str(TEMPLATE))
    args = ap.parse_args()
    last = time.perf_counter()

    def mark(what):
        nonlocal last
        if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
            sys.modules["torch"].cuda.synchronize()
        now = time.perf_counter()
        print(f"{what:<45}{now - last:7.2f} s", flush=True)
        last = now

    import torch

    mark("import torch")
    t = load_template(path=args.template, name="train")
    mark("import train.py (and the harness)")
    run = t.harness.start_run()
    mark("harness.start_run()")
    torch.manual_seed(42)
    mark("torch.manual_seed")
    config = t.model_config(run.vocab_size, run.seq_len)
    with torch.device(run.device):
        model = t.build_model(config)
    mark("build_model on the device")
    t.flops_per_token(model), t.flops_per_token(model, exact=True)
    mark("flops_per_token")
    t.setup_optimizer(model)
    mark("setup_optimizer (imports torch._dynamo)")
    t.setup_device(model, run.device)
    mark("setup_device (attention kernels, block masks)")
    make_loss_fn(t, model, run.device, compiled=run.device.type == "cuda")
    mark("make_loss_fn (torch.compile: torch._inductor)")
    loader = run.train_loader(t.DEVICE_BATCH_SIZE, 42)
    next(loader)
    mark("train_loader and its first batch")


if __name__ == "__main__":
    main()
