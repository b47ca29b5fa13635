# PIO round trip in any mode: DX = port, EAX = value; OUTs AL, AX, EAX to DX, then INs
# byte/word/dword from DX into EBX/ECX/ESI (zero-extended); HLT.
	.include "bits.inc"
	.text
	.globl _start
_start:
	out	dx, al
	out	dx, ax
	out	dx, eax
	in	al, dx
	movzx	ebx, al
	in	ax, dx
	movzx	ecx, ax
	in	eax, dx
	mov	esi, eax
	hlt
