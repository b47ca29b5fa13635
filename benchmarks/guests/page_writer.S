# Page writer, 32-bit protected mode: forever: add 1 to the first dword of each of ESI pages from EBX, then OUT AL to port DX (the host ends the run there).
	.intel_syntax noprefix
	.code32
	.text
	.globl _start
_start:
1:	mov	edi, ebx
	mov	ecx, esi
2:	add	dword ptr [edi], 1
	add	edi, 4096
	dec	ecx
	jnz	2b
	out	dx, al
	jmp	1b
