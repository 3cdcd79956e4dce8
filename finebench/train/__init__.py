"""Training engine, one job a module: runtime (device, precision, compile, memory format, threads), rng, step, evaluate, progress, fit (with resume); optim, threads, distributed, events."""
