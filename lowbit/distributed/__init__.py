"""Scale-out: launcher/engine checks, complete checkpoints, ZeRO-3 gathers."""
