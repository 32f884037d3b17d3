"""`python -m mla_gen.bench`: MLA decode times beside the device's measured ceilings and the peers.

    python -m mla_gen.bench                         # the default suite (cases.default_suite)
    python -m mla_gen.bench --peers --json r.json --plot roofline.png
    python -m mla_gen.bench --preset kimi-k2 --batch 32 --seqlens-random 1,16384
    python -m mla_gen.bench --heads 16 --ckv 512 --rope 64 --batch 8 --seqlen 65536 --s-q 2
    python -m mla_gen.bench --cases 1,2 --kv-dtype fp8_e4m3      # also on the fp8 cache, time / 16-bit time
    python -m mla_gen.bench --from-json r.json --plot roofline.png      # table and plot again, no GPU

Per case: inputs built once (random, paged, one combined cache); a float64 reference of a few requests;
then every mla-gen family (plan once, run timed), the torch baseline and, with --peers, every peer.
With --kv-dtype fp8_e4m3 or fp8_ds_mla, mla-gen's fp8 families also run on the cache quantized once
(untimed), checked against the float64 reference on its dequantization; the family dispatch picks for
the fp8 cache carries its time over dispatch's on the 16-bit cache. The torch baseline and the peers
stay on the 16-bit cache.
Each output is checked before its time counts: mla-gen's against the reference, the others' against
mla-gen's output (max abs diff shown). Times: CUDA events, warm-up, L2 flushed before each call, median
and p10-p90 of --iters runs. Bytes and FLOPs: mla_gen/bench/cases.py; ceilings: mla_gen/bench/timing.py.

Table on stdout, progress on stderr. Exit 0; 1 without a CUDA device or when an mla-gen or torch row
is WRONG or error (peers' rows never fail the run); 2 for a usage error (one line naming the argument).

Modules, each importing only those before it: cases (workloads, bytes, FLOPs; torch-free), roofline
(ceilings; torch-free), report (records, table, JSON; torch-free), plot, args, timing, impls, runner.
"""
