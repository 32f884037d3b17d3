"""Drop-in call conventions of other MLA decode libraries, on mla-gen's kernels.

    from mla_gen.compat.flash_mla import get_mla_metadata, flash_mla_with_kvcache    # FlashMLA
    from mla_gen.compat.flashinfer import BatchMLAPagedAttentionWrapper              # FlashInfer

Thin adapters (DESIGN.md section 7): they turn the upstream arguments into views and a plan
(mla_gen.MLADecodeWrapper), never into copies of the cache.
"""
