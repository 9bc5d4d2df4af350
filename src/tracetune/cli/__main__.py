from tracetune.cli import main

main()
