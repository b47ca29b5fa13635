# Page walker, 32-bit protected mode: forever: increment the dword at 0x2000, write the new count to the first dword of each of the 64 pages from 0x10000, OUT it on port 0xE9 (4 bytes), HLT.
	.intel_syntax noprefix
	.code32
	.text
	.globl _start
_start:
1:	mov	eax, [0x2000]
	inc	eax
	mov	[0x2000], eax
	mov	edi, 0x10000
	mov	ecx, 64
2:	mov	[edi], eax
	add	edi, 4096
	loop	2b
	out	0xe9, eax
	hlt
	jmp	1b
