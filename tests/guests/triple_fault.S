# Triple fault, 32-bit protected mode, must be loaded at 0x1000: loads an IDT with limit 0 then executes UD2 (#UD -> #GP -> #DF all beyond the IDT limit -> shutdown); no register inputs.
	.intel_syntax noprefix
	.code32
	.text
	.globl _start
	.set	LOAD, 0x1000
_start:
	lidt	[LOAD + (idtr - _start)]
	ud2
	hlt
	.p2align 2
idtr:
	.word	0
	.long	0
