"""Runtimes behind one small interface: onnxruntime, OpenVINO, tract and the ONNX reference.

    session = open_session(model, "openvino", precision="bf16")
    session.run(["logits"], {"input": x})        # list of numpy arrays, like onnxruntime
    session.info                                 # RuntimeInfo: what actually ran

A runtime is named `NAME` or `NAME:DEVICE`:

    onnxruntime   cpu or cuda (without a device: the `device` argument, 'auto' = CUDA when
                  it loads); runs the model in its own types. On CUDA, precision 'f32'
                  turns TF32 off (`use_tf32=0`); 'default' leaves onnxruntime's own choice,
                  reported as 'tf32' when the provider allows it.
    openvino      CPU; precision default | f32 | bf16 | f16 through INFERENCE_PRECISION_HINT.
                  'default' is OpenVINO's own pick: bf16 on CPUs with AVX-512 (native
                  AVX512-BF16/AMX, emulated on plain AVX-512), f32 elsewhere. A hint the CPU
                  cannot honour is ignored by OpenVINO: the precision it reports back is
                  the one recorded (and `RuntimeInfo.note` says what was asked).
                  Dynamic dimensions compile as they are (OpenVINO resolves them per request).
    tract         CPU (the `tract` wheel, sonos/tract); the model's own types. tract runs only
                  determined input shapes: a model whose inputs are not all fixed is built for
                  the shapes and types each batch brings (explicit input facts, one build held).
    reference     `onnx.reference.ReferenceEvaluator`: numpy, slow, independent of every
                  optimising runtime; the model's own types.

OpenVINO and tract are optional (`pip install 'onnxbn[openvino]'`, `'onnxbn[tract]'`) and
imported only when selected; selecting one that is missing is a UserError naming the pip
command. A model a runtime cannot load (an operator it lacks) is a UserError of one line
naming the runtime, the operator and the node.

`RuntimeInfo.precision` is the arithmetic precision the runtime reports for float layers
(f32, f16, bf16, tf32, f64). `lowered` is True when that is below the model's own float
type; `default_tolerance(...)` is then looser than the 1e-5 used for a full-precision run
(TOLERANCES, with the reasons in the README's "Deploying" section).

Modules: `sessions` (open_session), one `*_backend` per runtime, `base` (the Session interface, naming
and finding runtimes), `precision` (RuntimeInfo, tolerances), `errors` (load failures as one line).
"""
