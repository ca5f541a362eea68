from azdistill.cli import main

main()
