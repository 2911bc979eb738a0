"""What the scripts need that is not the algorithm (`dmd2.py`), one module per concern.

    runs.py       run plumbing both trainers share: torchrun set-up, autocast, atomic and safe checkpoint files,
                  random-state capture, flags from a config dataclass, the jsonl log with its tqdm line, plots
    edm.py        EDM's side: the ADM UNet and preconditioning, EDM network pickles, the denoiser adapter, samplers
    data.py       image data on disk: EDM dataset zips / folders, captioned image folders and tar shards, the
                  resumable real-image stream of the GAN term
    sd.py         diffusers' side: SD v1.5 / SDXL parts, conditioning, UNets as denoisers, LoRA, DDP / FSDP, exports
    metrics.py    EDM-comparable FID (Inception features in fp32), Frechet distances, clean-fid FID, patch FID, CLIP
    small.py      the small experiment: MNIST or own images, its small EDM teacher and classifier, KID, ablations
    benchmark.py  time and network calls of one generator update of the ImageNet architecture

Dependencies run one way: scripts -> these modules -> dmd2.py. No module here imports a script.
"""
