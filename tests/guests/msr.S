# MSR access, 32-bit protected mode: ECX = MSR index; RDMSR into EDI:ESI (high:low), then WRMSR with EBP:EBX (high:low); HLT.
	.intel_syntax noprefix
	.code32
	.text
	.globl _start
_start:
	rdmsr
	mov	esi, eax
	mov	edi, edx
	mov	eax, ebx
	mov	edx, ebp
	wrmsr
	hlt
