"""Everything that knows about ranks: process groups and devices, the DeepSpeed engine and the one module
that touches DeepSpeed internals, checkpoints, fp16 block scaling, hierarchical ZeRO-3 and PowerSGD."""
