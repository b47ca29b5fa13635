# Resume check, 32-bit protected mode: EAX = 1, HLT, then EAX = 2, HLT (a second run() must continue after the first HLT); no register inputs.
	.intel_syntax noprefix
	.code32
	.text
	.globl _start
_start:
	mov	eax, 1
	hlt
	mov	eax, 2
	hlt
