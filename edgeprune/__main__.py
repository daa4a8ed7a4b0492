from edgeprune.cli import main

raise SystemExit(main())
