from conceptguard.cli import main

raise SystemExit(main())
