from mishield.cli import main

main()
