; Deskbridge installer for Windows: per user, no administrator rights.
;
; Installs the PyInstaller bundle (dist\Deskbridge) into
; %LOCALAPPDATA%\Programs\Deskbridge, adds a Start-menu shortcut and an
; uninstaller registered under HKCU\...\Uninstall\Deskbridge, and offers to
; start Deskbridge at sign-in with the same Run value that
; app/core/autostart.py writes (HKCU\...\Run, value "Deskbridge",
; "<exe>" run --minimized), so the app's own setting shows the choice.
;
; Compile (installer/build.py does this):
;   makensis -DVERSION=0.1.0 -DVERSION4=0.1.0.0 -DPAYLOAD=dist/Deskbridge
;            -DICON=build/icons/deskbridge.ico -DOUTFILE=dist/Deskbridge-0.1.0-setup.exe
;            installer/windows/deskbridge.nsi
; makensis also runs on Linux, where CI compiles this script against a placeholder payload.
;
; Silent install: Deskbridge-VERSION-setup.exe /S [/AUTOSTART=0|1] [/D=FOLDER]
; Without /AUTOSTART, an upgrade keeps the current choice and a new install starts at sign-in.

Unicode true
ManifestDPIAware true
SetCompressor /SOLID lzma

!ifndef VERSION | VERSION4 | PAYLOAD | ICON | OUTFILE
  !error "define VERSION, VERSION4 (four numbers), PAYLOAD, ICON and OUTFILE; see the comment at the top"
!endif

!include "MUI2.nsh"
!include "nsDialogs.nsh"
!include "LogicLib.nsh"
!include "FileFunc.nsh"

!define APP_NAME "Deskbridge"
!define APP_EXE "Deskbridge.exe"
!define RELAY_EXE "deskbridge-relay.exe"
!define SETTINGS_KEY "Software\Deskbridge"
!define UNINSTALL_KEY "Software\Microsoft\Windows\CurrentVersion\Uninstall\Deskbridge"
; Same key and value name as WINDOWS_RUN_KEY and ENTRY_NAME in app/core/autostart.py.
!define RUN_KEY "Software\Microsoft\Windows\CurrentVersion\Run"
!define RUN_VALUE "Deskbridge"

Name "${APP_NAME}"
OutFile "${OUTFILE}"
RequestExecutionLevel user
InstallDir "$LOCALAPPDATA\Programs\${APP_NAME}"
InstallDirRegKey HKCU "${SETTINGS_KEY}" "InstallDir"
BrandingText "${APP_NAME} ${VERSION}"

VIProductVersion "${VERSION4}"
VIAddVersionKey "ProductName" "${APP_NAME}"
VIAddVersionKey "ProductVersion" "${VERSION}"
VIAddVersionKey "FileVersion" "${VERSION}"
VIAddVersionKey "FileDescription" "${APP_NAME} ${VERSION} setup"
VIAddVersionKey "LegalCopyright" "MIT License"

!define MUI_ICON "${ICON}"
!define MUI_UNICON "${ICON}"
!define MUI_ABORTWARNING
!define MUI_FINISHPAGE_RUN "$INSTDIR\${APP_EXE}"
!define MUI_FINISHPAGE_RUN_TEXT "Start ${APP_NAME} now"

Var StartAtLogin
Var StartAtLoginCheckbox

!insertmacro MUI_PAGE_WELCOME
!insertmacro MUI_PAGE_DIRECTORY
Page custom StartAtLoginPageCreate StartAtLoginPageLeave
!insertmacro MUI_PAGE_INSTFILES
!insertmacro MUI_PAGE_FINISH

!insertmacro MUI_UNPAGE_CONFIRM
!insertmacro MUI_UNPAGE_INSTFILES

!insertmacro MUI_LANGUAGE "English"

Function .onInit
  ; An upgrade keeps whether Deskbridge starts at sign-in; a new install turns it on.
  StrCpy $StartAtLogin 1
  ReadRegStr $0 HKCU "${SETTINGS_KEY}" "InstallDir"
  ${If} $0 != ""
    ClearErrors
    ReadRegStr $1 HKCU "${RUN_KEY}" "${RUN_VALUE}"
    ${If} ${Errors}
      StrCpy $StartAtLogin 0
    ${EndIf}
  ${EndIf}
  ${GetParameters} $0
  ClearErrors
  ${GetOptions} $0 "/AUTOSTART=" $1
  ${IfNot} ${Errors}
    ${If} $1 == "1"
      StrCpy $StartAtLogin 1
    ${Else}
      StrCpy $StartAtLogin 0
    ${EndIf}
  ${EndIf}
FunctionEnd

Function StartAtLoginPageCreate
  !insertmacro MUI_HEADER_TEXT "Start at sign-in" "Choose whether ${APP_NAME} starts when you sign in to Windows."
  nsDialogs::Create 1018
  Pop $0
  ${If} $0 == error
    Abort
  ${EndIf}
  ${NSD_CreateLabel} 0 0 100% 40u "${APP_NAME} can start in the notification area each time you sign in, so that cloud services reach your desktop applications without you opening it. You can change this later in ${APP_NAME}'s settings."
  Pop $0
  ${NSD_CreateCheckbox} 0 48u 100% 12u "&Start ${APP_NAME} when I sign in to Windows"
  Pop $StartAtLoginCheckbox
  ${If} $StartAtLogin == 1
    ${NSD_Check} $StartAtLoginCheckbox
  ${EndIf}
  nsDialogs::Show
FunctionEnd

Function StartAtLoginPageLeave
  ${NSD_GetState} $StartAtLoginCheckbox $0
  ${If} $0 == ${BST_CHECKED}
    StrCpy $StartAtLogin 1
  ${Else}
    StrCpy $StartAtLogin 0
  ${EndIf}
FunctionEnd

; Files of a running Deskbridge cannot be replaced; ask the person to quit it first.
; tasklist's CSV output starts with the quoted image name when the program runs,
; and with "INFO: No tasks" when it does not.
!macro WaitUntilClosed UN
Function ${UN}WaitUntilClosed
  ${Do}
    nsExec::ExecToStack 'tasklist /FI "IMAGENAME eq ${APP_EXE}" /FO CSV /NH'
    Pop $0
    Pop $1
    ${If} $0 != 0
      Return ; tasklist is missing or failed; the file copy reports locked files itself
    ${EndIf}
    StrLen $2 '"${APP_EXE}"'
    StrCpy $3 $1 $2
    ${If} $3 != '"${APP_EXE}"'
      Return
    ${EndIf}
    MessageBox MB_RETRYCANCEL|MB_ICONEXCLAMATION "${APP_NAME} is running. Quit it from its tray icon (right-click, Quit), then choose Retry." /SD IDCANCEL IDRETRY +2
    Abort
  ${Loop}
FunctionEnd
!macroend
!insertmacro WaitUntilClosed ""

Section "${APP_NAME}" SectionMain
  SectionIn RO
  Call WaitUntilClosed
  SetOutPath "$INSTDIR"
  ; Remove the previous version's modules, so that none of them shadows a new one.
  RMDir /r "$INSTDIR\_internal"
  File /r "${PAYLOAD}/*"
  WriteUninstaller "$INSTDIR\Uninstall.exe"

  CreateShortcut "$SMPROGRAMS\${APP_NAME}.lnk" "$INSTDIR\${APP_EXE}" "" "$INSTDIR\${APP_EXE}" 0
  WriteRegStr HKCU "${SETTINGS_KEY}" "InstallDir" "$INSTDIR"

  WriteRegStr HKCU "${UNINSTALL_KEY}" "DisplayName" "${APP_NAME}"
  WriteRegStr HKCU "${UNINSTALL_KEY}" "DisplayVersion" "${VERSION}"
  WriteRegStr HKCU "${UNINSTALL_KEY}" "Publisher" "${APP_NAME}"
  WriteRegStr HKCU "${UNINSTALL_KEY}" "DisplayIcon" "$INSTDIR\${APP_EXE},0"
  WriteRegStr HKCU "${UNINSTALL_KEY}" "InstallLocation" "$INSTDIR"
  WriteRegStr HKCU "${UNINSTALL_KEY}" "UninstallString" '"$INSTDIR\Uninstall.exe"'
  WriteRegStr HKCU "${UNINSTALL_KEY}" "QuietUninstallString" '"$INSTDIR\Uninstall.exe" /S'
  WriteRegDWORD HKCU "${UNINSTALL_KEY}" "NoModify" 1
  WriteRegDWORD HKCU "${UNINSTALL_KEY}" "NoRepair" 1
  ${GetSize} "$INSTDIR" "/S=0K" $0 $1 $2
  IntFmt $0 "0x%08X" $0
  WriteRegDWORD HKCU "${UNINSTALL_KEY}" "EstimatedSize" "$0"

  ${If} $StartAtLogin == 1
    WriteRegStr HKCU "${RUN_KEY}" "${RUN_VALUE}" '"$INSTDIR\${APP_EXE}" run --minimized'
  ${Else}
    DeleteRegValue HKCU "${RUN_KEY}" "${RUN_VALUE}"
  ${EndIf}
SectionEnd

!insertmacro WaitUntilClosed "un."

; Removes the program, its shortcut and registry values. Settings in
; %APPDATA%\Deskbridge, logs in %LOCALAPPDATA%\Deskbridge and the sign-in token
; in Credential Manager stay, so a reinstall keeps the sign-in.
Section "Uninstall"
  Call un.WaitUntilClosed
  Delete "$SMPROGRAMS\${APP_NAME}.lnk"
  DeleteRegValue HKCU "${RUN_KEY}" "${RUN_VALUE}"
  DeleteRegKey HKCU "${UNINSTALL_KEY}"
  DeleteRegKey HKCU "${SETTINGS_KEY}"
  ; Only the files this installer wrote, so a folder chosen by mistake loses nothing else.
  RMDir /r "$INSTDIR\_internal"
  Delete "$INSTDIR\${APP_EXE}"
  Delete "$INSTDIR\${RELAY_EXE}"
  Delete "$INSTDIR\Uninstall.exe"
  RMDir "$INSTDIR"
SectionEnd
