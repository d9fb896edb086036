"""A loader worker that runs the cyclic GC while the parent holds unreachable FFmpeg filter graphs (test_data.py)."""
import gc, sys
import av, numpy as np, torch
from torch.utils.data import DataLoader, IterableDataset

def garbage_graph():
    r = av.AudioResampler(format="flt", layout="mono", rate=16000)
    fr = av.AudioFrame.from_ndarray(np.zeros((1, 4410), np.int16), format="s16", layout="mono")
    fr.sample_rate = 44100
    r.resample(fr)
    cycle = [r]
    cycle.append(cycle)          # unreachable after return: only the cyclic GC frees it

class DS(IterableDataset):
    def __iter__(self):
        gc.collect()             # what any allocation-triggered collection does in the worker
        yield torch.zeros(1)

if __name__ == "__main__":
    gc.disable()
    for _ in range(3):
        garbage_graph()
    gc.enable()
    if sys.argv[1] == "fixed":
        from mer_dist.data.stream import Loader, _worker_init
        dl = Loader(DS(), batch_size=None, num_workers=1, worker_init_fn=_worker_init)
    else:
        dl = DataLoader(DS(), batch_size=None, num_workers=1)
    print(list(dl))
