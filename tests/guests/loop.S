# Infinite loop, any mode (EB FE is the same in 16/32/64-bit code): `jmp .` at the entry point, position independent, uses no registers; never exits by itself.
	.intel_syntax noprefix
	.code32
	.text
	.globl _start
_start:
	jmp	.
