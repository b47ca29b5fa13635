# PIO exit benchmark guest: ECX = iterations, DX = port (set by host); one byte OUT per iteration, then HLT.
	.intel_syntax noprefix
	.code32
	.text
	.globl _start
_start:
1:	out	dx, al
	dec	ecx
	jnz	1b
	hlt
