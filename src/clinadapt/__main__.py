from clinadapt.cli import main

raise SystemExit(main())
