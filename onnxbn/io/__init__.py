"""Model files and where a model's bytes live.

`wire` (protobuf framing, scanned without a full parse), `tensors` (where a tensor's bytes are:
inline, a file range, an in-memory array), `copies` (light copies, provenance hash, metadata),
`load` (reading with every tensor checked), `save` (atomic and staged writes), `model` (the `Model`
every transform takes and returns), `npzfile` (the per-tensor .npz files of stats and ranges).
"""
