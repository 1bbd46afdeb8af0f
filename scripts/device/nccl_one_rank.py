import os, sys, time, tempfile, torch, torch.distributed as dist, faulthandler
faulthandler.dump_traceback_later(25, exit=True)
t = time.time()
dist.init_process_group("nccl", init_method=f"file://{tempfile.mkdtemp()}/init", rank=0, world_size=1)
x = torch.ones(4, device="cuda"); dist.all_reduce(x); torch.cuda.synchronize()
print("nccl one-rank all_reduce ok", x.tolist(), f"{time.time() - t:.1f} s", flush=True)
out = [torch.empty(4, device="cuda")]; dist.all_gather(out, x); torch.cuda.synchronize(); print("all_gather ok", flush=True)
dist.destroy_process_group()
