from sfttrain.cli import main

main()
