"""Pure ``torch.nn`` building blocks of the zoo. Nothing here may import Lightning."""
