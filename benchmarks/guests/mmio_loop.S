# MMIO exit benchmark guest: ECX = iterations, EBX = unbacked MMIO address (set by host); 4-byte store per iteration, then HLT.
	.intel_syntax noprefix
	.code32
	.text
	.globl _start
_start:
1:	mov	dword ptr [ebx], eax
	dec	ecx
	jnz	1b
	hlt
