"""The family-neutral lower layer: what models, export, engines and tools all need.

    errors.py     `IcmoeError`, the root of every error the toolkit raises on purpose
    io.py         atomic writes, hashing, versioned JSON documents
    specs.py      tensor specs (name, dtype, shape with the dynamic batch axis)
    manifest.py   the build directory's manifest.json and its artifacts
    parity.py     element-wise logit tolerances, flipped pixels, Dice: the measures parity gates use
    cli.py        the one command-line convention every command follows
    extras.py     the optional parts (pip extras) and the one-line error when one is missing
    fetch.py      pinned downloads (the Triton server wheel, tensorrt-stubs): sha256-checked, cached

Nothing here imports a model family, `export` or `engines`.
"""
