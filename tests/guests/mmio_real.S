# MMIO round trip, 16-bit real mode: EBX = linear MMIO base A < 1 MiB (clobbered: ES = A >> 4, BX = A & 15), EAX = value; stores AL->[A], AX->[A+2], EAX->[A+4], then loads byte [A]->ECX, word [A+2]->ESI, dword [A+4]->EDI (zero-extended); HLT. Uses EDX as scratch.
	.intel_syntax noprefix
	.code16
	.text
	.globl _start
_start:
	mov	edx, ebx
	shr	edx, 4
	mov	es, dx
	and	bx, 0xf
	mov	byte ptr es:[bx], al
	mov	word ptr es:[bx + 2], ax
	mov	dword ptr es:[bx + 4], eax
	movzx	ecx, byte ptr es:[bx]
	movzx	esi, word ptr es:[bx + 2]
	mov	edi, dword ptr es:[bx + 4]
	hlt
