from onnxbn.cli import main

raise SystemExit(main())
