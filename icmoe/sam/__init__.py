"""The SAM parts every family shares: the backbone configuration (`config`), builders and the decoders'
unused heads (`build`), SAM checkpoints read and resized to any input size (`checkpoint`), and the
Medical-SAM-Adapter style adapters (`adapter`). The modules themselves are segment-anything's."""
