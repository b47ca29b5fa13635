# Endless port reader, 32-bit protected mode: DX = port; forever: IN EAX, DX (4-byte read), copy it to EBX, increment ECX; never halts.
	.intel_syntax noprefix
	.code32
	.text
	.globl _start
_start:
1:	in	eax, dx
	mov	ebx, eax
	inc	ecx
	jmp	1b
