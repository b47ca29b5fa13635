# MMIO round trip, 32-bit protected mode: EBX = MMIO base A, EAX = value; stores AL->[A], AX->[A+2], EAX->[A+4], then loads byte [A]->ECX, word [A+2]->ESI, dword [A+4]->EDI (zero-extended); HLT.
	.intel_syntax noprefix
	.code32
	.text
	.globl _start
_start:
	mov	byte ptr [ebx], al
	mov	word ptr [ebx + 2], ax
	mov	dword ptr [ebx + 4], eax
	movzx	ecx, byte ptr [ebx]
	movzx	esi, word ptr [ebx + 2]
	mov	edi, dword ptr [ebx + 4]
	hlt
